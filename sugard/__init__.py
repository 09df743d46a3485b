"""sugard: one live SugarCRM OAuth2 session per instance, shared by every local script."""

__version__ = "0.1.0"
