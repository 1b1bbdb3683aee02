"""The thin HTTP API: validate, write rows, publish, read status. It never imports torch."""
