"""The fleet: this host's ledger shipped to one PostgreSQL database, read there with
every other host's, and rolling upgrades coordinated through it.

The host's ledger stays local (steps never wait on the network): ``ship`` sends its
rows to the fleet database, ``pusher`` keeps doing so as changes happen, ``spawn``
starts a pusher from a step without waiting for it, ``pushstate`` remembers how the
pushes went. ``slots`` and ``brake`` are the limits of a rolling upgrade, which
``rollout`` applies around an ``apply`` run; ``reports`` reads the fleet.
docs/fleet.md describes the model.
"""
