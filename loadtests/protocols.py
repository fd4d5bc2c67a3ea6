"""The gateway edges the load tests exercise, and the Locust user class for each (a module of
its own: importing Locust monkey-patches the process with gevent, the runner must not)."""

PROTOCOLS = {"rest": "RestUser", "oip_grpc": "OipGrpcUser", "stow": "StowUser",
             "dimse": "DimseUser"}
