"""The HTTP side: aiohttp.web lives here (and in app.py) only."""
