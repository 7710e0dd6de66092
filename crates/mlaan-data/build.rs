//! Compiles `csrc/jpeg_bridge.c` against the system libjpeg-turbo and links it. The headers
//! and library come from Debian's `libjpeg62-turbo-dev` (installed by scripts/setup.sh); the
//! bridge needs libjpeg-turbo 2.0 or newer for region decoding (`jpeg_crop_scanline`,
//! `jpeg_skip_scanlines`), which its own `#error` checks.
//!
//! `pkg-config libjpeg` finds them when pkg-config is installed; otherwise the compiler's
//! default paths are used once `jpeglib.h` is seen there. Either way a missing library stops
//! the build here with a message naming the package, not with a compiler error.

use std::path::Path;

const PACKAGE: &str = "libjpeg62-turbo-dev";

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg_bridge.c");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let mut build = cc::Build::new();
    build.file("csrc/jpeg_bridge.c").warnings(true).extra_warnings(true).opt_level(2);
    match pkg_config::Config::new().atleast_version("2.0").probe("libjpeg") {
        Ok(lib) => {
            for dir in &lib.include_paths {
                build.include(dir);
            }
        }
        Err(probe) => {
            let dirs = ["/usr/include", "/usr/local/include"];
            if !dirs.iter().any(|d| Path::new(d).join("jpeglib.h").is_file()) {
                panic!(
                    "\n\nmlaan-data decodes JPEGs with the system libjpeg-turbo, whose headers \
                     were not found (no jpeglib.h in {dirs:?}; pkg-config: {probe}).\n\
                     Install them with:\n    sudo apt-get install -y {PACKAGE}\n\
                     (scripts/setup.sh, which every `make` target runs, does this).\n\n"
                );
            }
            println!("cargo:rustc-link-lib=jpeg");
        }
    }
    build.compile("mlaan_jpeg_bridge");
}
