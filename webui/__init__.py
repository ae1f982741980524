"""The query-by-image web page and JSON API (Flask application factory)."""
