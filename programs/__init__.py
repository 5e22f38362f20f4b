"""apexdsp.programs: the search agents, as DSPy modules.

Programs (``registry.build_program(name, retriever=..., **options)``): ``vanilla``, ``rag``, ``opera``,
``apex``, ``qagent``. Their parts: :mod:`.planner` (question -> plan, with the tolerant plan parser),
:mod:`.executor` (sub-goals -> searched and answered records), :mod:`.reflector`, :mod:`.answer`. Every
program returns ``answer`` and a :class:`.trajectory.Trajectory`.
"""
