"""The segd HTTP daemon (FastAPI + uvicorn)."""
