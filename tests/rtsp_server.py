"""A real RTSP server for the source tests: GStreamer's RTSP server library (Debian's
gir1.2-gst-rtsp-server-1.0), serving an MJPEG AVI file as RTP/JPEG on 127.0.0.1:PORT/cam.
Run with the system Python (``/usr/bin/python3 rtsp_server.py VIDEO PORT``; PORT 0 picks a free
one); prints the bound port, then serves until killed. Each client gets the video from its
start (the file is long enough for a test)."""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[2])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(f"( filesrc location={sys.argv[1]} ! avidemux ! rtpjpegpay name=pay0 pt=26 )")
server.get_mount_points().add_factory("/cam", factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on 127.0.0.1:{sys.argv[2]}")
print(server.get_bound_port(), flush=True)
GLib.MainLoop().run()
