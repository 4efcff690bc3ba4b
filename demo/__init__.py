"""The built-in demonstration of gradmix: not part of the service.

A selection server and a `gradmix-train` run on synthetic arithmetic tasks
(`tasks`), some of which help the target and some hurt it, a uniform-mixture
run beside it, and a report comparing the two (`report`). It drives the
trainer exactly as a user would: a TOML job file and the `gradmix-train`
process (`run`). Installed with the `demo` extra; run it with
`python -m gradmix.demo` (`make demo`).
"""
