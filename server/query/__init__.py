"""Read side of the REST API: runs, series, health and events, cursors."""
