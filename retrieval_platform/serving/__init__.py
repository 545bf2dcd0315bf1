"""The Ray Serve application: deployments, HTTP guard, builder, declarative control."""
