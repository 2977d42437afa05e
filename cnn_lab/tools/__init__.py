"""Tools around the training path: evaluate finished runs, predict, look inside a model
(inspect_run), benchmark, summarise a model, report a sweep."""
