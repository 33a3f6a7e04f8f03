"""The service's routers, one module per group of routes; `service.main` includes them."""
