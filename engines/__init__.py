"""Fast execution of the RealCustom++ method: backends behind one interface, and the batch runner."""
