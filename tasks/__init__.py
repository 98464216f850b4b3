"""The work the flows call: FITS I/O, geometry, detection, measurement, the simulator."""
