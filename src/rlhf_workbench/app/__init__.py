"""The web app (Gradio tabs, HTTP API, dashboard, auth, page keys) and the OpenAI-compatible model server."""
