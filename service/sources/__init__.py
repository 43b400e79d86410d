"""One module per kind of model source; `service.model_source.resolve` picks between them."""
