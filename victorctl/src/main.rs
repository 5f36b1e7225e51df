//! victorctl: command-line client of the VICTOR controller. Being implemented.

fn main() {
    eprintln!("victorctl: not implemented yet");
    std::process::exit(2);
}
