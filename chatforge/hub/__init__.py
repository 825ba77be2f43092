"""Share a model: publish a folder to a model repo, write a deployable app for it."""
