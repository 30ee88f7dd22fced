"""HTTP routes: generation (`customize`), asynchronous jobs (`jobs`), operations (`ops`)."""
