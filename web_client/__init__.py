"""The browser client's static files, installed as the package ``realtime.web``."""
