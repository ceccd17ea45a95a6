"""First-order Taylor scores on each client's own data; the client plans."""

from cahfp.strategies.base import ClientPlanned


class Taylor(ClientPlanned):
    name = "taylor"
    description = "first-order Taylor scores on each client's data"
    scorer = "taylor"
