"""The admin console: server-rendered pages at ``/console/`` over the same service layer as the
API (``app.connectors``, ``app.webhooks``), signed in with a server-side session."""
