"""loopsearch's builtin plugins, installed under the import name ``loopsearch_builtins``.

They are registered through the ``loopsearch`` entry-point group exactly as third-party
plugins are (see pyproject.toml), so they show up in ``loopsearch plugins list`` the same way.
"""
