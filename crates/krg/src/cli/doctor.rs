//! `krg doctor`: what this node can do, and why not when it cannot.

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Print a JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<i32> {
    let f = crate::features::probe();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        print!("{}", f.render_text());
    }
    Ok(0)
}
