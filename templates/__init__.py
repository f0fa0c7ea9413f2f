"""The report's jinja2 templates; a package so that importlib.resources finds them installed."""
