"""nxlink-openapi-proxy: a multi-tenant API-key gateway for the nxlink OpenAPI."""

__version__ = "0.1.0"
