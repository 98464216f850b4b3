"""Survey simulator: GalSim galaxies and PSFs, lenstronomy lenses, clusters, anomalies, truth."""
