"""One module per pipeline stage; `vigorl` (jobs.cli) dispatches to them."""
