//! The hostile-input corpus in `tests/fixtures/hostile/`, run through the
//! same entry points the fuzz targets drive.
