"""The query-by-image web page and JSON API.

    from webui import create_app
    app = create_app({"INDEXES": ["indexes/sample"]})
"""

from webui.app import create_app

__all__ = ["create_app"]
