"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser that takes bytes from outside.

One module per target under `fuzz/targets/`, each with `one_input(data)`, the exceptions
it may raise on purpose (`ALLOWED`: the project's refusals) and `seeds()`, the inputs made
from the test fixtures that `python -m fuzz.seeds` writes to `fuzz/corpus/<target>/`.
`python -m fuzz.run` (`make fuzz`) runs each target in its own process for a bounded time
or number of executions and reports executions, crashes, slow inputs and peak memory.

A crash is any other exception (IndexError, RecursionError, an assertion of a round-trip
property...); a slow input one that takes over a second. Both are saved with their input
and traceback under the run's output folder, and the run fails.
"""
