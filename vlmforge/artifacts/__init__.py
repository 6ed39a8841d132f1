"""What a build produces and how it is described: engine.json and the store's manifest."""
