"""One module per tab of the app: each builds its widgets and wires its own events."""
