"""The build spec: its schema, the values derived from it, and the model catalog."""
