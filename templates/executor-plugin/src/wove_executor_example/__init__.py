"""An example Wove executor plugin."""

from .executor import ExampleEnvironmentExecutor

__all__ = ["ExampleEnvironmentExecutor"]
