"""The benchmarks: each module here is one, run from the repo root as `python -m bench.<name>` or, as the
docs do, `python bench/<name>.py` (see `_repo_root`), and called in-process by its test as
`bench.<name>.main([...argv])`. The helpers beside them (`report`, `netproxy`, `merge_in_process`) serve
the benchmarks and the tests, which is why they live here and not in the installed packages.
"""
