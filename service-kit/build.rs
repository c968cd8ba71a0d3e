//! `embed_migrations!` reads `../migrations` at compile time; a new migration
//! directory must rebuild this crate.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
