"""Cluster mode: engine replicas on Ray Serve with adapter-affinity routing.

app.py        the Serve application (``serving.cluster.app:build_app``, the RayService import)
replica.py    one engine replica (Engine + EngineLoop + job worker) as a Serve deployment
router.py     the request router: an adapter's requests go where the adapter is
directory.py  which replica holds what; cluster-wide adapter names
backend.py    the gRPC servicers' backend over the deployment handle (request.py: streams)
ingress.py    the gRPC server inside the application; cli.py: `adapterhub serve --ray`
placement.py, jobs.py  fine-tune jobs from the shared store, placed on replicas
registry.py, metrics.py, config.py, messages.py  the rest

Nothing here is imported by the embedded server: Ray loads only in cluster mode.
"""
