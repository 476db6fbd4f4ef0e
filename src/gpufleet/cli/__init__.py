"""The ``gpufleet`` command line: Typer apps, one module per command group. Thin: parse, call,
print; the work happens in the packages they call."""
