"""The application layer: the only code that reads a :class:`raggen.config.RaggenConfig`.

Each command (``raggen index build``, ``train``, ``eval``, ``retrieve``, ``serve``, ``quickstart``,
``dry-run``) is a ``*_from_config`` function here that turns the config's sections into the typed
settings and plain arguments of the library packages (``corpus``, ``models``, ``objectives``,
``index``, ``train``, ``serve``, ``decoding``), which never import ``raggen.config`` or this
package (``tests/unit/test_import_graph.py`` holds them to it). ``raggen.cli`` and ``jobs/*.py``
call these functions and nothing below them.
"""
