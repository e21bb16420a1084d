"""Remote access: the HTTPS application (sign-in, sessions) and DICOMweb, one process.

``app.create_app`` builds the ASGI application; ``server.WebService`` runs it with the
vault's hardened TLS context in a thread of ``pacsvault serve``.
"""
