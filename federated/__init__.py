"""Federated adapter training with Flower (flwr 1.41 Message API).

``strategies`` holds the aggregation rules as pure array functions, ``validation`` the checks
every client update passes, ``task`` the local training, ``client_app`` / ``server_app`` the
Flower apps. Only adapter tensors (numpy arrays in ArrayRecords) ever leave a client.
"""
