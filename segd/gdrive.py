"""Google Drive downloads without TensorFlow or extra dependencies (urllib only).

The original coral-deeplab published its trained files on Google Drive. A Drive download is not
one GET: ``uc?export=download&id=ID`` answers a large file with an HTML "can't scan this file
for viruses" page, which must be confirmed — formerly a ``download_warning_*`` cookie or a
``confirm=TOKEN`` link back to ``uc``, since 2024 a GET form posting ``id``, ``export``,
``confirm`` and ``uuid`` to ``drive.usercontent.google.com/download``. Over its download quota,
for a private or deleted file, Drive still answers 200 or 403 with an HTML page. So every
answer is checked: HTML where a model was expected is an error that names the problem (quota,
access, unknown page with its title), never a file saved as a model.

Transfers resume: a cut-off transfer is continued with an HTTP ``Range`` request (a few times
in one call, and in a later call from the ``.partial`` file left behind). The caller verifies
the checksum and renames the file into place (:func:`segd.variants.fetch`).

The base URL comes from the ``gdrive_url`` setting (``SEGD_GDRIVE_URL``), so tests point it at
a local imitation of these answers.
"""

from __future__ import annotations

import html
import http.client
import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BASE_URL",
    "DriveAccessDenied",
    "DriveError",
    "DriveHtmlPage",
    "DriveNotFound",
    "DriveQuotaExceeded",
    "DriveTruncated",
    "download",
    "download_url",
]

DEFAULT_BASE_URL = "https://drive.google.com/uc"
CHUNK = 1 << 20
HTML_LIMIT = 1 << 20  # read at most this much of an HTML page to understand it
MAX_HOPS = 4  # uc -> interstitial -> confirmed download (-> one more redirect page)
RESUME_ATTEMPTS = 3  # Range continuations within one call after a cut-off transfer

ProgressFn = Callable[[int, int], None]


class DriveError(OSError):
    """Google Drive did not deliver the file; the message says why."""


class DriveNotFound(DriveError):
    """No such file id (404): the link died, or the file was made private/deleted."""


class DriveHtmlPage(DriveError):
    """Drive answered with an HTML page instead of the file."""


class DriveQuotaExceeded(DriveHtmlPage):
    """The file's download quota is used up ("Too many users have viewed or downloaded...")."""


class DriveAccessDenied(DriveHtmlPage):
    """The file needs a Google sign-in or an access request."""


class DriveTruncated(DriveError):
    """The transfer ended early; the partial file is kept so the next call resumes it."""


def download_url(base_url: str, file_id: str, **extra: str) -> str:
    """``<base>?export=download&id=<id>`` (plus ``extra`` query parameters)."""
    query = urllib.parse.urlencode({"export": "download", "id": file_id, **extra})
    sep = "&" if "?" in base_url else "?"
    return f"{base_url}{sep}{query}"


class _Page(HTMLParser):
    """What a Drive HTML page says: title, forms with hidden inputs, confirm links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self._in_title = False
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in_title = True
        elif tag == "form":
            self.forms.append((a.get("action", ""), {}))
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


_QUOTA = re.compile(r"quota exceeded|too many users have viewed or downloaded", re.I)
_ACCESS = re.compile(r"you need access|request access|accounts\.google\.com/ServiceLogin|sign in", re.I)
_CONFIRM = re.compile(r"confirm=([0-9A-Za-z_-]+)")


def _next_url(page_text: str, base_url: str, file_id: str, cookies: http.cookiejar.CookieJar) -> str:
    """The URL that confirms a virus-scan interstitial, or raise naming what the page is."""
    page = _Page()
    page.feed(page_text)
    title = " ".join(page.title.split())
    if _QUOTA.search(page_text):
        raise DriveQuotaExceeded(
            f"Google Drive refuses file {file_id}: download quota exceeded ({title or 'quota page'}); "
            "try again in 24 hours, or download it in a browser signed in to Google and put it in the "
            "models directory (its md5 is checked)"
        )
    for action, fields in page.forms:  # 2024+: GET form to drive.usercontent.google.com/download
        if fields.get("id") and ("confirm" in fields or "uuid" in fields):
            target = urllib.parse.urljoin(base_url, html.unescape(action))
            if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
                break
            return f"{target}?{urllib.parse.urlencode(fields)}"
    for cookie in cookies:  # before 2024: a download_warning cookie holds the token
        if cookie.name.startswith("download_warning") and cookie.value:
            return download_url(base_url, file_id, confirm=cookie.value)
    for href in page.links:  # ... or a link back to uc with confirm=TOKEN
        m = _CONFIRM.search(html.unescape(href))
        if m and "id=" in href:
            return download_url(base_url, file_id, confirm=m.group(1))
    if _ACCESS.search(page_text):
        raise DriveAccessDenied(
            f"Google Drive refuses file {file_id}: it needs a Google sign-in or access request "
            f"({title or 'sign-in page'}); the file is no longer public"
        )
    raise DriveHtmlPage(
        f"Google Drive answered file {file_id} with an HTML page ({title or 'untitled'}) instead of "
        "the file, and segd does not know how to get past it"
    )


def _is_html(content_type: str, head: bytes) -> bool:
    if content_type.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    start = head[:512].lstrip().lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """``bytes 100-199/200`` -> (100, 200); ``bytes */200`` -> (-1, 200)."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value)
    if not m:
        return None
    start = int(m.group(1)) if m.group(1) is not None else -1
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def download(
    file_id: str,
    dest: Path,
    *,
    base_url: str = DEFAULT_BASE_URL,
    progress: ProgressFn | None = None,
    timeout: float = 60.0,
    max_bytes: int | None = None,
) -> None:
    """Download Drive file ``file_id`` into ``dest`` (normally a ``.partial`` path), resuming
    what ``dest`` already holds. Raises :class:`DriveError` (a subclass naming the problem).

    On HTML pages, 404s and other refusals ``dest`` is removed (nothing there is the file); on a
    transfer cut short it is kept, so a later call resumes it with ``Range``. ``max_bytes``
    bounds the file (a server sending more is cut off, and ``dest`` removed).
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]{10,200}", file_id):
        raise DriveError(f"{file_id!r} is not a Google Drive file id")
    cookies = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(cookies))
    url = download_url(base_url, file_id)
    try:
        for _ in range(RESUME_ATTEMPTS + 1):
            url = _transfer(opener, url, base_url, file_id, dest, cookies, progress, timeout, max_bytes)
            if not url:
                return
        raise DriveTruncated(
            f"Google Drive file {file_id}: transfer cut off {RESUME_ATTEMPTS + 1} times; "
            f"{dest.stat().st_size if dest.exists() else 0} bytes kept in {dest}, run again to resume"
        )
    except (DriveTruncated, KeyboardInterrupt):
        raise  # what arrived is kept: the next call resumes it
    except BaseException:
        dest.unlink(missing_ok=True)  # an HTML page, a refusal, an oversize file: nothing to keep
        raise


def _transfer(
    opener: urllib.request.OpenerDirector,
    url: str,
    base_url: str,
    file_id: str,
    dest: Path,
    cookies: http.cookiejar.CookieJar,
    progress: ProgressFn | None,
    timeout: float,
    max_bytes: int | None,
) -> str:
    """One pass: follow interstitials, then copy the body. Returns "" when the file is complete,
    else the URL to continue from (a cut-off transfer, to be resumed with Range)."""
    for _ in range(MAX_HOPS):
        have = dest.stat().st_size if dest.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "segd"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            with exc:
                if exc.code == 416 and have:
                    crange = _content_range(exc.headers.get("Content-Range"))
                    if crange is not None and crange[1] == have:
                        return ""  # the partial file already is the whole file
                    dest.unlink(missing_ok=True)  # stale partial: start again
                    continue
                body = exc.read(HTML_LIMIT) if exc.fp is not None else b""
                if exc.code == 404:
                    raise DriveNotFound(
                        f"Google Drive has no file {file_id} (HTTP 404): the link is dead, or the "
                        "file was deleted or made private"
                    ) from None
                if _is_html(exc.headers.get("Content-Type", ""), body):
                    _next_url(body.decode("utf-8", "replace"), base_url, file_id, cookies)  # raises
                raise DriveError(f"Google Drive file {file_id}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DriveError(f"cannot reach Google Drive ({urllib.parse.urlsplit(url).netloc}): {reason}") from None
        with resp:
            ctype = resp.headers.get("Content-Type", "")
            head = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
            if _is_html(ctype, head):
                text = (head + resp.read(max(0, HTML_LIMIT - len(head)))).decode("utf-8", "replace")
                url = _next_url(text, base_url, file_id, cookies)
                continue
            resumed = bool(have) and resp.status == 206
            if have and resumed:
                crange = _content_range(resp.headers.get("Content-Range"))
                if crange is None or crange[0] != have:
                    raise DriveError(f"Google Drive file {file_id}: bad Content-Range for resume: {resp.headers.get('Content-Range')}")
            start = have if resumed else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else 0
            if max_bytes is not None and total > max_bytes:
                raise DriveError(f"Google Drive file {file_id}: {total} bytes, more than the {max_bytes} expected")
            done = _copy(resp, head, dest, start, total, progress, max_bytes, file_id)
            if total and done < total:
                return url  # cut off: continue with Range from what arrived
            return ""
    raise DriveHtmlPage(f"Google Drive file {file_id}: still an HTML page after {MAX_HOPS} confirmations")


def _copy(
    resp: Any, head: bytes, dest: Path, start: int, total: int, progress: ProgressFn | None,
    max_bytes: int | None, file_id: str,
) -> int:  # fmt: skip
    """Append (or write from 0) the body to ``dest``; return the size reached. A connection
    that drops mid-body is a short transfer, not an error: the caller resumes it."""
    read = getattr(resp, "read1", resp.read)
    done = start
    with open(dest, "ab" if start else "wb") as out:
        chunk = head
        while chunk:
            out.write(chunk)
            done += len(chunk)
            if max_bytes is not None and done > max_bytes:
                raise DriveError(f"Google Drive file {file_id}: more than the {max_bytes} bytes expected")
            if progress is not None:
                progress(done, total)
            try:
                chunk = read(CHUNK)
            except (OSError, http.client.IncompleteRead):
                break
        out.flush()
    return done
