"""The endpoints, one module per route group, each a plain function over the app's
:class:`~realtime.service.Service`; :func:`realtime.server.create_app` mounts them."""
