"""The parts of the service tree, one room per role part (docs/operations.md).

``center`` (registry + center API), ``engine`` (mesh point, engine API, center link, queues, mesh
peers, Lua clients and one ``ProtocolServer`` per ``engine.servers[]`` entry, in ``servers``),
``supervisor`` (the worker processes of a multi-process engine and a worker's watch on its
supervisor).  ``connmix_tx.service`` chooses the parts of a role from a table.
"""
