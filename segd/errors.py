"""Typed errors. Each carries a stable machine-readable ``code`` and the HTTP status the
daemon answers with, so the HTTP layer maps errors without knowing where they came from."""

from __future__ import annotations


class SegdError(Exception):
    """Base of every error segd and coral_deeplab raise on purpose: the HTTP layer answers with
    ``http_status`` and :func:`error_body`, the command line prints ``code: detail`` and exits 2.
    Errors that were ValueErrors (or RuntimeErrors) before they had a code still are, too."""

    code = "error"
    http_status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def error_body(code: str, detail: str) -> dict[str, str]:
    """The JSON body of every error answer: ``{"error": code, "detail": message}``."""
    return {"error": code, "detail": detail}


# --- configuration ------------------------------------------------------------------------
class ConfigError(SegdError, ValueError):
    """A setting (TOML file, ``SEGD_*`` environment, flag) is unknown or out of range. Also a
    ValueError, as settings errors were before they had a code."""

    code = "bad_setting"
    http_status = 500


class InsecureBind(SegdError, ValueError):
    """A non-loopback bind without an API key (or with a weak one)."""

    code = "insecure_bind"


class InstallError(SegdError):
    """``segd install-service`` cannot do what was asked (missing file, bad path, not root)."""

    code = "install_failed"


class GeometryError(SegdError, ValueError):
    """An input size, depth multiplier or logits grid that DeepLab's geometry does not allow."""

    code = "bad_geometry"
    http_status = 422


# --- client input -------------------------------------------------------------------------
class BadImage(SegdError):
    """The bytes claim to be an image but cannot be decoded (corrupt, truncated)."""

    code = "bad_image"
    http_status = 400


class EmptyImage(BadImage):
    """No bytes, or an image with a zero dimension."""

    code = "empty_image"


class UnsupportedImage(SegdError):
    """The bytes are not an image format segd reads."""

    code = "unsupported_media_type"
    http_status = 415


class ImageTooLarge(SegdError):
    """Declared or decoded pixel count over the configured limit (decompression bombs)."""

    code = "image_too_large"
    http_status = 413


class BadParameter(SegdError):
    code = "bad_parameter"
    http_status = 422


class UnknownModel(SegdError):
    code = "unknown_model"
    http_status = 404


# --- HTTP requests ------------------------------------------------------------------------
class Unauthorized(SegdError):
    code = "unauthorized"
    http_status = 401


class UnsupportedContentType(SegdError):
    """The request body is not multipart/form-data, image/* or application/octet-stream."""

    code = "unsupported_media_type"
    http_status = 415


class UploadTooLarge(SegdError):
    code = "upload_too_large"
    http_status = 413


class ClientGone(SegdError):
    """The client closed the connection (or timed out) before its upload was complete. Nothing
    can be answered; 499 (nginx's "client closed request") is what the metrics count."""

    code = "client_disconnected"
    http_status = 499


# --- models and runtimes ------------------------------------------------------------------
class ModelError(SegdError):
    """A model file or manifest entry is missing, corrupt or does not match the manifest."""

    code = "model_error"
    http_status = 503


class ChecksumMismatch(ModelError):
    code = "checksum_mismatch"


class ModelNotFound(ModelError):
    code = "model_not_found"


class RuntimeUnavailable(SegdError):
    """A runtime or accelerator cannot be used (library missing, no device, delegate failed)."""

    code = "runtime_unavailable"
    http_status = 503


class ModelNotReady(SegdError):
    code = "model_not_ready"
    http_status = 503


class Overloaded(SegdError):
    """More work than can be answered in time; ``retry_after`` says when it would fit (seconds)."""

    code = "overloaded"
    http_status = 503

    def __init__(self, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class WorkerCrashed(SegdError):
    code = "worker_crashed"
    http_status = 503


class RequestTimeout(SegdError):
    code = "timeout"
    http_status = 503


class PageNotFound(SegdError):
    """An unknown path under the web page."""

    code = "not_found"
    http_status = 404


# --- datasets (evaluation and training) ----------------------------------------------------
class DatasetError(SegdError):
    """A dataset directory is not in a layout segd reads, or an image/mask pair is unusable
    (missing file, undecodable mask, sizes differ, class id out of range)."""

    code = "bad_dataset"
    http_status = 422


# --- camera sources ------------------------------------------------------------------------
class UnknownSource(SegdError):
    """No camera of that name is configured (only configured cameras are ever read)."""

    code = "unknown_source"
    http_status = 404


class NoFrameYet(SegdError):
    """The camera has not delivered a segmented frame yet (connecting, or offline)."""

    code = "no_frame"
    http_status = 503
