"""What several test modules share: paths of the test data, transformers references, waiting, the
Petals request builders, fake hubs and adapters. Test modules import from here, never from each other."""
