"""Publishing a merged model: its model card (data + template), the GGUF repo's card, the Hub upload."""
