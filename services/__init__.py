"""Ray Serve deployments: thin wrappers over vigorl_core."""
