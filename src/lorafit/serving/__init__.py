"""``lorafit serve``: a saved classifier behind an HTTP API (text-embeddings-inference's /predict) and a web page."""
