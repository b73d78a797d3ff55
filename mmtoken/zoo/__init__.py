"""Model zoo: small models for tests and examples."""
