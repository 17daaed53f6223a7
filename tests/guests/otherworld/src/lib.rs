//! A well-formed WebAssembly component of a world that is not
//! `kvdb:script/script`: it imports an interface the server does not offer
//! and exports `run` instead of `handle`. Uploading it must be refused
//! with 400 (tests/e2e/wasm.rs).

#[allow(unsafe_code, missing_docs, clippy::all, clippy::pedantic)]
mod bindings {
    wit_bindgen::generate!({
        inline: "
            package test:other;

            interface greeter {
                greeting: func() -> string;
            }

            world other {
                import greeter;
                export run: func() -> string;
            }
        ",
        world: "other",
    });

    struct Other;

    impl Guest for Other {
        fn run() -> String {
            // Uses the import so the linker keeps it in the component.
            format!("{} from another world", test::other::greeter::greeting())
        }
    }

    export!(Other);
}
