"""The ground floor: errors, the state machine, time, input rules and host facts.

Nothing here touches a database or a file of the ledger; every other part builds on it.
"""
